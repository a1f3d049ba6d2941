# dncut image for the Ray cluster launcher (cluster.yaml) and KubeRay (deploy/kuberay/).
#
#   docker build -t <registry>/dncut:0.1.0 .
#   docker push <registry>/dncut:0.1.0
#
# e.g. <registry> = 123456789012.dkr.ecr.us-west-2.amazonaws.com (log in first with
#   aws ecr get-login-password --region us-west-2 | docker login --username AWS --password-stdin <registry>).
# cluster.yaml (docker.image) and deploy/kuberay/*.yaml pin this tag: build a new tag for every
# change, never :latest. Inside the image `python jobs/train.py --config configs/train/vits16_dino.yaml`
# runs from the working directory /home/ray/dncut.
#
# Ray 2.60.0 on Python 3.11 as in constraints.txt. torch 2.14.1 brings its own CUDA 13 runtime
# (pip nvidia-* wheels); the host needs an NVIDIA driver >= 580 (see cluster.yaml's ImageId).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/dncut

# 1) the dependencies only (the slow layer: torch + CUDA wheels), listed by pyproject.toml and
#    pinned by constraints.txt; rebuilt only when one of the two changes
COPY --chown=ray:users pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --constraint constraints.txt -r /tmp/requirements.txt

# 2) the project itself (non-editable), same constraints
COPY --chown=ray:users . .
RUN pip install --no-cache-dir --constraint constraints.txt . \
    && rm -rf build ./*.egg-info \
    && python -c "import dncut, torch, ray; assert ray.__version__ == '2.60.0', ray.__version__"
