# The two commands that matter (see README.md):
#   make run    the main job: the operator against your cluster and TrueNAS, or a local demo
#   make test   the whole test suite (what CI runs)
# Dependencies are locked (uv.lock, exported with hashes to requirements/*.txt; every install uses them):
#   make lock          after adding, removing or changing a dependency in pyproject.toml (also after a
#                      merge that did): re-locks, keeping the other pins; commit uv.lock and requirements/
#   make lock-upgrade  take the newest releases pyproject.toml allows
# `make lint` (so CI) fails when pyproject.toml and the lock disagree.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test unit lint lock lock-upgrade crd controlplane argocd-health venv clean bench bench-smoke bench-scale

venv:
	@bash tools/bootstrap.sh

controlplane: venv
	@bash tools/build-controlplane.sh >/dev/null

# Argo CD's Lua runtime for the health-check tests (tools/argocd-health), cached like the control plane.
argocd-health:
	@bash tools/build-argocd-health.sh >/dev/null

run: venv
	@PYTHONPATH=tools $(PY) -m truenas_incus_dev start

lock: venv
	@bash tools/lock.sh

lock-upgrade: venv
	@bash tools/lock.sh --upgrade

lint: venv
	bash tools/lock.sh --check
	$(VENV)/bin/ruff check operator tests tools benchmarks
	$(VENV)/bin/ruff format --check operator tests tools benchmarks
	$(VENV)/bin/mypy
	PYTHONPATH=operator $(VENV)/bin/lint-imports

# Tests keep compiled bytecode (pytest's rewritten test modules too) in an ignored folder, also where
# the environment says PYTHONDONTWRITEBYTECODE: without it every xdist worker and every operator
# subprocess compiled the whole tree again (make unit: 31 s of CPU instead of 18 s on 2 cores).
TEST_ENV := env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=$(CURDIR)/.cache/pycache

# The fast tier: everything that does not need the local control plane (no Go build). Most of its
# time is tests waiting (timeouts, backoffs, simulated jobs), so 8 workers on 2 cores: 24 s.
unit: venv
	$(TEST_ENV) $(VENV)/bin/pytest -m "not e2e" -n 8 --dist worksteal $(PYTEST_ARGS)

test: venv controlplane argocd-health lint
	$(TEST_ENV) $(VENV)/bin/pytest $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-oldest

# The oldest Kubernetes the project supports (README "Kubernetes versions"): the CRDs' and the
# admission policies' refusals, spec.expose and the lifecycle smoke against its kube-apiserver.
OLDEST_TESTS := tests/test_admission.py tests/test_policy_e2e.py tests/test_expose_e2e.py \
	tests/test_operator.py::test_container_reaches_running_with_status \
	tests/test_operator.py::test_updates_reach_truenas_and_status \
	tests/test_operator.py::test_delete_stops_and_deletes_then_releases
test-oldest: venv controlplane
	TIO_CONTROLPLANE_BIN=$$(bash tools/build-controlplane-oldest.sh | tail -1) TIO_EXPECT_KUBERNETES=1.31 \
		$(TEST_ENV) $(VENV)/bin/pytest $(OLDEST_TESTS) $(PYTEST_ARGS)

bench: venv controlplane
	PYTHONPATH=tools $(PY) benchmarks/bench.py --output benchmarks/results.json

bench-smoke: venv controlplane
	PYTHONPATH=tools $(PY) benchmarks/bench.py --smoke

# 5000 IncusInstances over 10 TrueNAS simulators, each in its own process (~15 minutes).
bench-scale: venv controlplane
	PYTHONPATH=tools $(PY) benchmarks/scale.py --output benchmarks/results-scale.json

crd: venv
	$(PY) -m truenas_incus_operator crd

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
