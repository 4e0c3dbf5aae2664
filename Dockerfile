# Image for apo stages on a cluster. CPU build by default; pass a CUDA torch in TORCH_SPEC
# for GPU pools (e.g. --build-arg TORCH_SPEC="torch==2.13.0 --index-url <cuda wheel index>").
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false APO_HOME=/opt/apo
WORKDIR /opt/apo
COPY pyproject.toml constraints.txt ./
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
 && pip install --no-cache-dir ${TORCH_SPEC} \
 && pip install --no-cache-dir -c /tmp/constraints.txt $(python -c "import tomllib;print(' '.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" | sed 's/torch[^ ]*//')
COPY apo_core apo_core
COPY tasks tasks
COPY flows flows
COPY prefect.yaml ./
RUN pip install --no-cache-dir --no-deps -e .
ENTRYPOINT ["apo"]
