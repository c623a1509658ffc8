# The watcher (watch_orthanc.py) as a container, for deploy/hospital/docker-compose.yml.
# - Runs as an unprivileged user (uid 10001), never root.
# - Model weights are data, mounted read-only at run time: never baked into the image.
# - No credentials inside: ORTHANC_URL/ORTHANC_USERNAME/ORTHANC_PASSWORD come from the
#   environment; the project's .env is excluded by .dockerignore and not read (CXRSR_DOTENV).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CXRSR_DOTENV=/dev/null

WORKDIR /opt/cxrsr
COPY requirements.txt ./
# PyTorch's CPU wheels (the default CUDA build adds about 5 GB); for a GPU host build with
#   docker compose build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" "torch==2.14.1" "torchvision==0.29.1" \
    && pip install -r requirements.txt

COPY cxrsr/ cxrsr/
COPY process_dicom.py generate_sr.py upload_dicom.py watch_orthanc.py ./
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/cxrsr \
        --shell /usr/sbin/nologin cxrsr \
    && install -d -o cxrsr -g cxrsr -m 0700 /var/lib/cxrsr /var/lib/cxrsr/state \
    && install -d -o cxrsr -g cxrsr -m 0750 /var/lib/cxrsr/weights

USER 10001:10001
ENTRYPOINT ["python", "/opt/cxrsr/watch_orthanc.py"]
CMD ["--state-dir", "/var/lib/cxrsr/state", "--cache-dir", "/var/lib/cxrsr/weights"]
