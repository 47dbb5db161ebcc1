# Quick start:  make demo   (set up + sample a clip with the embedded tiny model)
#               make test   (set up + run the whole test suite)
#               make app    (set up + serve the trajectory editor on http://127.0.0.1:7860)
VENV    ?= .venv
PY      := $(VENV)/bin/python
# Two-core machines: one OpenMP thread per process (more threads make small models 20-50x slower
# whenever the other core is busy).  Override with OMP_NUM_THREADS=N make ...
export OMP_NUM_THREADS ?= 1

.PHONY: setup test demo app train-demo golden clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest

golden: setup
	$(PY) -m pytest -m golden -v

clean-venv:
	rm -rf $(VENV)

# The embedded tiny default: random-weight checkpoints (made once), then an image-to-video sample with
# a trajectory.  The weights are untrained, so the video shows no real content.  (The small model
# trained on moving shapes, configs/tora/model/tora_small*.yaml, is made by
# scripts/train_moving_objects.py on a GPU; see docs/EVALUATION.md.)
demo: setup
	$(PY) scripts/make_tiny_checkpoints.py --if-missing
	$(PY) sat/sample_video.py --base configs/tora/model/tora_tiny.yaml configs/tora/model/tora_tiny_i2v.yaml \
		configs/tora/inference.yaml --load ckpts/tiny/i2v --image2video --img_dir assets/images \
		--input-file assets/i2v_prompts.txt --point_path trajs/pause.txt --output-dir samples/demo
	@echo "demo videos: samples/demo/video (trajectory overlay: samples/demo/traj_video)"

# The trajectory editor in the browser, on the default model of configs/tora/app.yaml (the one place
# that names it); the tiny checkpoints are written once if missing.  APP_ARGS: e.g. --listen 0.0.0.0,
# or --base ... --load ... for another model.
app: setup
	$(PY) scripts/make_tiny_checkpoints.py --if-missing
	$(PY) sat/app.py $(APP_ARGS)

# Fine-tune the tiny model on training_examples/ on the CPU (the training loop + DeepSpeed, gloo,
# fp32; random-weight RAFT, so the motion conditioning is arbitrary), then sample from the new
# checkpoint.  Writes outputs/train-demo/tiny-*/ (metrics.jsonl, checkpoints) and samples/train-demo/.
TRAIN_DEMO_BASE := configs/tora/model/tora_tiny.yaml configs/tora/train_dense.yaml configs/tora/train_tiny.yaml
train-demo: setup
	$(PY) scripts/make_tiny_checkpoints.py --if-missing
	$(PY) -c "import sys; sys.path.insert(0, 'sat'); from tora.training import write_random_raft; \
		write_random_raft('ckpts/tiny/raft/raft_small_random.pth', 'raft_small', if_missing=True)"
	rm -rf outputs/train-demo
	$(PY) sat/train_video.py --base $(TRAIN_DEMO_BASE)
	$(PY) sat/sample_video.py --base configs/tora/model/tora_tiny.yaml configs/tora/inference.yaml \
		--load $$(ls -d outputs/train-demo/tiny-* | tail -n 1) --input-file training_examples/labels/disc_line.txt \
		--point_path trajs/diagonal.txt --output-dir samples/train-demo
	@echo "training run: $$(ls -d outputs/train-demo/tiny-* | tail -n 1) (metrics.jsonl, checkpoints); samples: samples/train-demo/video"
