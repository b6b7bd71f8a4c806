# lipexp: `make reproduce-chapter4` (installs what it needs first) and `make test`.
PROFILE ?= quick
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= dev,cluster,reports,pretrained,lightning
LIPEXP := $(BIN)/lipexp
# Chapter 4's sweeps are many small CPU-bound runs: one process per core with 1 torch thread each finishes
# them ~1.2x sooner than one process using every core. `make reproduce-chapter4 LAUNCH=` runs them one by one.
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
LAUNCH ?= hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) threads=1
# Use the offline data mirror next to the checkout when there is one and nothing else was chosen.
ifeq ($(origin LIPEXP_DATA_MIRROR), undefined)
  ifneq ($(wildcard ../shared/data/mnist.npz),)
    export LIPEXP_DATA_MIRROR := $(abspath ../shared/data)
  endif
endif

CHAPTER3 := fig3_2 fig3_3 fig3_4 table2_1 bounds
CHAPTER4 := fig4_2 fig4_8 fig4_4 fig4_5 fig4_6 fig4_7
CHAPTER4_SINGLE := fig4_3 fig4_1 init_k0
CHAPTER5 := fig5_2 gaussian lemma5_3_4 fig5_1 fig5_4 fig5_5 fig5_6
CHAPTER7 := fig7_2 fig7_1
CHAPTER6 := fig6_zoo fig6_1 fig6_2 fig6_6 fig6_7 fig6_9 fig6_10 fig6_11 fig6_12 fig6_13 fig6_15 fig6_16 fig6_3 fig6_8

.PHONY: help install test reproduce-chapter3 reproduce-chapter4 reproduce-chapter5 reproduce-chapter6 \
        reproduce-chapter7 reproduce-all report bench clean clean-runs

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'
	@echo "  PROFILE=$(PROFILE)  (smoke | quick | paper)"

install: $(STAMP) ## create .venv and install lipexp (editable) with its extras

# The Makefile is a prerequisite too: it names EXTRAS, and a venv made before an extra was added must get it.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $(STAMP)

test: install ## run the test suite
	$(BIN)/python -m pytest -q

# $(1): figures; $(2): extra overrides (a launcher)
define run_figures
	@set -e; for f in $(1); do \
	  echo "== $$f (profile $(PROFILE))"; \
	  $(LIPEXP) -m figure=$$f profile=$(PROFILE) $(2) $(ARGS); \
	done
endef

# $(1): figures of one run each, started side by side with 1 thread each; every one runs to its end, and the
# target fails if any failed. With LAUNCH= they run one by one (run_figures).
define run_side_by_side
	@pids=""; for f in $(1); do \
	  echo "== $$f (profile $(PROFILE), side by side)"; \
	  $(LIPEXP) -m figure=$$f profile=$(PROFILE) threads=1 $(ARGS) & pids="$$pids $$!"; \
	done; \
	failed=0; for p in $$pids; do wait $$p || failed=1; done; exit $$failed
endef

reproduce-chapter3: install ## Chapter 3: singular-value derivatives, Table 2.1, bounds
	$(call run_figures,$(CHAPTER3))
	$(MAKE) --no-print-directory report

reproduce-chapter4: install ## Chapter 4: the SDE for K(t) (Figs 4.1-4.8)
	$(call run_figures,$(CHAPTER4),$(LAUNCH))
	$(if $(strip $(LAUNCH)),$(call run_side_by_side,$(CHAPTER4_SINGLE)),$(call run_figures,$(CHAPTER4_SINGLE)))
	$(MAKE) --no-print-directory report

reproduce-chapter5: install ## Chapter 5: Fourier analysis (Figs 5.1-5.6)
	$(call run_figures,$(CHAPTER5))
	$(MAKE) --no-print-directory report

reproduce-chapter6: install ## Chapter 6: I-ASIDE (Figs 6.1-6.16)
	$(call run_figures,$(CHAPTER6))
	$(MAKE) --no-print-directory report

reproduce-chapter7: install ## Chapter 7: spectral-gap and alignment regularisers (Figs 7.1-7.2, new)
	$(call run_figures,$(CHAPTER7))
	$(MAKE) --no-print-directory report

reproduce-all: reproduce-chapter3 reproduce-chapter4 reproduce-chapter5 reproduce-chapter6 reproduce-chapter7 ## every chapter

report: install ## rebuild results/index.md (the gallery) from the saved figures
	$(BIN)/python -m experiments.report

bench: install ## speed/memory benchmarks (ratios measured side by side)
	@set -e; for s in scripts/bench_*.py; do echo "== $$s"; $(BIN)/python $$s; done

clean: ## remove the venv, caches and build files (keeps results/)
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

clean-runs: ## remove run directories, checkpoints and logs under results/ (keeps figures and summaries)
	rm -rf results/*/runs
