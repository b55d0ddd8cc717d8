# make test: the test suite in two processes (creates .venv with the requirements unless a virtual or conda
# environment is active)
# make demo: phantom -> preprocessing -> training -> testing on the CPU, everything under demo_output/

ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PYTHON := python
STAMP := .make/requirements.stamp
else
PYTHON := .venv/bin/python
STAMP := .venv/requirements.stamp
endif

DEMO := demo_output
# The full method on the compact configuration: contrastive loss from epoch 1, fused head from epoch 3.
DEMO_TRAIN := --dataset Phantom --root_path $(DEMO)/data --vit_name compact --no_pretrain \
	--prior_encoder offline --prior_embeddings $(DEMO)/priors_offline_intensity.pt \
	--batch_size 8 --max_epochs 12 --start_contrast_epoch 1 --region_fusion_start_epoch 3 \
	--val_every 1 --save_every 100 --output_dir $(DEMO)/run

.PHONY: install test demo clean

install: $(STAMP)

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/python -m pip install --quiet --upgrade pip

$(STAMP): requirements.txt $(if $(filter .venv/%,$(STAMP)),.venv/bin/python)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	mkdir -p $(dir $@) && touch $@

# The browser test renders the results pages in headless Chromium: installed here where apt-get is there (as root,
# on CI's machine); where that fails the test is skipped and says why.
test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		(DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium could not be installed: the browser test will be skipped"
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	rm -rf $(DEMO)
	$(PYTHON) preprocess_data.py --dataset Phantom --src_path $(DEMO)/phantom_raw --dst_path $(DEMO)/data \
		--phantom_cases 30 --val_fraction 0.1
	$(PYTHON) train.py $(DEMO_TRAIN)
	$(PYTHON) test.py --output_dir $(DEMO)/run --test_save_dir $(DEMO) --save_png
	@echo "Open $(DEMO)/index.html: the 6 test cases, worst pathology Dice first, with their overlays"
	@echo "Overlays: $(DEMO)/<case>.png; training curves: $(DEMO)/run/progress.png"

clean:
	rm -rf .make .pytest_cache $(DEMO)
