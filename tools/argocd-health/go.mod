// The Argo CD health-check harness: runs resource_customizations/**/health.lua in the Lua
// runtime Argo CD uses. Versions are those argoproj/argo-cd v3.5.1 pins in its go.mod
// (gopher-lua v1.1.2, layeh.com/gopher-json 97fed8db8427, sigs.k8s.io/yaml for test inputs).
module truenas-incus-operator.invalid/argocd-health

go 1.26.0

require (
	github.com/yuin/gopher-lua v1.1.2
	layeh.com/gopher-json v0.0.0-20190114024228-97fed8db8427
	sigs.k8s.io/yaml v1.6.0
)

require go.yaml.in/yaml/v2 v2.4.2 // indirect
