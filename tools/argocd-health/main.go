// Command argocd-health runs an Argo CD resource health script (health.lua) the way Argo CD
// runs it, so the project can test its IncusInstance check in Argo CD's own Lua runtime instead of
// a stand-alone Lua 5.4.
//
// Usage:
//
//	argocd-health [-open-libs] -script health.lua -tests health_test.yaml
//	    runs every case of an Argo CD health_test.yaml (inputPath relative to that file) and prints
//	    one JSON object per case: {"inputPath", "expected", "actual", "ok"}; exit status 1 when a
//	    case differs, 2 on a usage or input error.
//	argocd-health [-open-libs] -script health.lua [object.yaml|-]
//	    prints the health of one object (YAML or JSON; "-" or nothing reads stdin) as JSON.
//
// Without -open-libs the script runs as an argocd-cm health script does by default
// (resource.customizations.useOpenLibs.<group>_<kind> unset); with -open-libs it runs as a
// built-in script from argo-cd's resource_customizations/ folder does (Argo CD enables the
// standard libraries for those, and its tests run them that way).
//
// What is mirrored, from argoproj/argo-cd tag v3.5.1 (commit 109ca7ca71139e514114499d294a492e7910a965):
//   - go.mod: github.com/yuin/gopher-lua v1.1.2, layeh.com/gopher-json v0.0.0-20190114024228-97fed8db8427,
//     sigs.k8s.io/yaml v1.6.0 (this module pins the same versions).
//   - gitops-engine/pkg/health/health.go, GetResourceHealth: an object with a deletionTimestamp (and
//     without the hook finalizer of gitops-engine/pkg/sync/hook/hook.go) is Progressing
//     "Pending deletion" before any custom check runs; a script error becomes Unknown with the
//     error text; no result (nil) falls through to the built-in checks, which have nothing for
//     this group (GetHealthCheckFunc), so the object has no health. Same in the standalone
//     argoproj/gitops-engine v0.7.3 (commit 3516b3928a06c7d04c200f06beaf04b3c2bef63f).
//   - util/lua/lua.go, runLuaWithResourceActionParameters: lua.NewState with SkipOpenLibs unless
//     useOpenLibs, then the package, base and table libraries and util/lua/oslib_safe.go's
//     OpenSafeOs, the "os" module preloaded with SafeOsLoader, a 1 s context deadline, the global
//     `obj` built by decodeValue, the script run with DoString, and the Lua stack trace removed
//     from run-time errors.
//   - util/lua/lua.go, decodeValue: JSON numbers become Lua numbers (float64), json.Number a
//     string, arrays are built with LTable.Append (which drops nil, so null items vanish and the
//     rest close up), maps with RawSetH (null values leave no key).
//   - util/lua/lua.go, ExecuteHealthLua and isValidHealthStatusCode: the value on top of the
//     stack; a table is encoded with layeh.com/gopher-json and unmarshalled into
//     {status, message}; an empty table (encoded as an array) is an empty status; a status not in
//     Healthy/Progressing/Degraded/Suspended/Missing/Unknown becomes Unknown "Lua returned an
//     invalid health status"; nil is an empty status; any other type is an error.
//   - util/lua/health_test.go, TestLuaHealthScript: health_test.yaml ({tests: [{inputPath,
//     healthStatus}]}), inputs read with sigs.k8s.io/yaml, compared to healthStatus.
//
// The code here is written for this project; none of it is copied from Argo CD.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"time"

	lua "github.com/yuin/gopher-lua"
	luajson "layeh.com/gopher-json"
	"sigs.k8s.io/yaml"
)

// Health is gitops-engine's health.HealthStatus, with the same JSON names.
type Health struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
}

// Argo CD's health status codes (gitops-engine/pkg/health/health.go).
var validStatus = map[string]bool{
	"Unknown": true, "Progressing": true, "Healthy": true, "Suspended": true, "Degraded": true, "Missing": true,
}

const hookFinalizer = "argocd.argoproj.io/hook-finalizer"

// resourceHealth is what Argo CD shows for obj: gitops-engine's checks, then the script.
// A nil result means "no health" (the script returned nothing usable and no built-in check
// exists for the kind).
func resourceHealth(obj map[string]any, script string, openLibs bool) *Health {
	if pendingDeletion(obj) {
		return &Health{Status: "Progressing", Message: "Pending deletion"}
	}
	health, err := runHealthScript(obj, script, openLibs)
	if err != nil {
		return &Health{Status: "Unknown", Message: err.Error()}
	}
	return health
}

// pendingDeletion is unstructured.GetDeletionTimestamp() != nil && !hook.HasHookFinalizer(obj).
func pendingDeletion(obj map[string]any) bool {
	metadata, _ := obj["metadata"].(map[string]any)
	stamp, _ := metadata["deletionTimestamp"].(string)
	if stamp == "" {
		return false
	}
	if _, err := time.Parse(time.RFC3339, stamp); err != nil {
		return false // GetDeletionTimestamp yields nil for a value it cannot parse
	}
	finalizers, _ := metadata["finalizers"].([]any)
	for _, f := range finalizers {
		if f == hookFinalizer {
			return false
		}
	}
	return true
}

func runHealthScript(obj map[string]any, script string, openLibs bool) (*Health, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	defer L.Close()
	// Argo CD (re)opens these four whatever useOpenLibs says, in this order.
	libs := []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, openSafeOs},
	}
	for _, lib := range libs {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return nil, fmt.Errorf("opening %s: %w", lib.name, err)
		}
	}
	L.PreloadModule(lua.OsLibName, safeOsLoader)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	L.SetContext(ctx)
	L.SetGlobal("actionParams", L.CreateTable(0, 0))
	L.SetGlobal("obj", toLua(L, obj))

	if err := L.DoString(script); err != nil {
		var apiErr *lua.ApiError
		if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = ""
			return nil, apiErr
		}
		return nil, err
	}
	returned := L.Get(-1)
	switch returned.Type() {
	case lua.LTNil:
		return &Health{}, nil
	case lua.LTTable:
	default:
		return nil, fmt.Errorf("expect table output from Lua script, not %s", returned.Type().String())
	}
	encoded, err := luajson.Encode(returned)
	if err != nil {
		return nil, err
	}
	health := &Health{}
	if err := json.Unmarshal(encoded, health); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) && typeErr.Value == "array" {
			return &Health{}, nil // an empty Lua table encodes as []
		}
		return nil, err
	}
	if !validStatus[health.Status] {
		return &Health{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return health, nil
}

// The safe os library of util/lua/oslib_safe.go: only time and date. Argo CD's OpenSafeOs
// registers them with RegisterModule under the name lua.TabLibName ("table"); that module is
// already loaded by then, so RegisterModule returns it unchanged and adds nothing. Net effect,
// reproduced here by making the same calls: without the standard libraries a script has no
// global os and no table.time, and require("os") (SafeOsLoader, preloaded) gives a table with
// time and date; with them, the global os is gopher-lua's full os library.
// The two functions are gopher-lua's own, which Argo CD's copies were taken from.
var safeOsFuncs = func() map[string]lua.LGFunction {
	scratch := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer scratch.Close()
	scratch.Push(scratch.NewFunction(lua.OpenOs))
	scratch.Push(lua.LString(lua.OsLibName))
	scratch.Call(1, 0)
	module := scratch.GetGlobal(lua.OsLibName).(*lua.LTable)
	funcs := map[string]lua.LGFunction{}
	for _, name := range []string{"time", "date"} {
		funcs[name] = module.RawGetString(name).(*lua.LFunction).GFunction
	}
	return funcs
}()

func openSafeOs(L *lua.LState) int {
	L.Push(L.RegisterModule(lua.TabLibName, safeOsFuncs))
	return 1
}

func safeOsLoader(L *lua.LState) int {
	L.Push(L.SetFuncs(L.NewTable(), safeOsFuncs))
	return 1
}

// toLua is decodeValue: JSON-shaped Go values to Lua values.
func toLua(L *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case json.Number:
		return lua.LString(v)
	case float64:
		return lua.LNumber(v)
	case int:
		return lua.LNumber(v)
	case int32:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case []any:
		array := L.CreateTable(len(v), 0)
		for _, item := range v {
			array.Append(toLua(L, item)) // Append ignores nil: null items are dropped
		}
		return array
	case map[string]any:
		table := L.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(L, item))
		}
		return table
	}
	return lua.LNil
}

// readObject reads YAML or JSON as Argo CD's tests read testdata (sigs.k8s.io/yaml: YAML to
// JSON to map[string]any, numbers as float64).
func readObject(data []byte) (map[string]any, error) {
	obj := map[string]any{}
	if err := yaml.Unmarshal(data, &obj); err != nil {
		return nil, err
	}
	return obj, nil
}

type testFile struct {
	Tests []struct {
		InputPath    string `json:"inputPath"`
		HealthStatus Health `json:"healthStatus"`
	} `json:"tests"`
}

type caseResult struct {
	InputPath string  `json:"inputPath"`
	Expected  Health  `json:"expected"`
	Actual    *Health `json:"actual"`
	OK        bool    `json:"ok"`
}

func runTests(script string, testsPath string, openLibs bool, out io.Writer) (bool, error) {
	data, err := os.ReadFile(testsPath)
	if err != nil {
		return false, err
	}
	var tests testFile
	if err := yaml.UnmarshalStrict(data, &tests); err != nil {
		return false, fmt.Errorf("%s: %w", testsPath, err)
	}
	if len(tests.Tests) == 0 {
		return false, fmt.Errorf("%s: no tests", testsPath)
	}
	allOK := true
	encoder := json.NewEncoder(out)
	for _, test := range tests.Tests {
		input, err := os.ReadFile(filepath.Join(filepath.Dir(testsPath), test.InputPath))
		if err != nil {
			return false, err
		}
		obj, err := readObject(input)
		if err != nil {
			return false, fmt.Errorf("%s: %w", test.InputPath, err)
		}
		actual := resourceHealth(obj, script, openLibs)
		ok := actual != nil && reflect.DeepEqual(*actual, test.HealthStatus)
		allOK = allOK && ok
		if err := encoder.Encode(caseResult{test.InputPath, test.HealthStatus, actual, ok}); err != nil {
			return false, err
		}
	}
	return allOK, nil
}

func main() {
	scriptPath := flag.String("script", "", "the health.lua to run")
	testsPath := flag.String("tests", "", "an Argo CD health_test.yaml to run")
	openLibs := flag.Bool("open-libs", false, "open the Lua standard libraries (built-in scripts; argocd-cm useOpenLibs)")
	flag.Parse()
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "argocd-health:", err)
		os.Exit(2)
	}
	if *scriptPath == "" {
		fail(errors.New("-script is required"))
	}
	script, err := os.ReadFile(*scriptPath)
	if err != nil {
		fail(err)
	}
	if *testsPath != "" {
		if flag.NArg() > 0 {
			fail(errors.New("give either -tests or an object, not both"))
		}
		ok, err := runTests(string(script), *testsPath, *openLibs, os.Stdout)
		if err != nil {
			fail(err)
		}
		if !ok {
			os.Exit(1)
		}
		return
	}
	var input []byte
	if flag.NArg() == 0 || flag.Arg(0) == "-" {
		input, err = io.ReadAll(os.Stdin)
	} else {
		input, err = os.ReadFile(flag.Arg(0))
	}
	if err != nil {
		fail(err)
	}
	obj, err := readObject(bytes.TrimSpace(input))
	if err != nil {
		fail(err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(resourceHealth(obj, string(script), *openLibs)); err != nil {
		fail(err)
	}
}
