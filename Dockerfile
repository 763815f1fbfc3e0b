# BatchSender image: one image for every process; the default command is the worker engine.
#   docker build -t batchsender .
#   docker run --env-file .env.prod batchsender                   # batchsender worker
#   docker run --env-file .env.prod -p 6001:6001 batchsender batchsender api
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 batchsender \
 && useradd --system --uid 10001 --gid batchsender --home-dir /home/batchsender \
        --create-home --shell /usr/sbin/nologin batchsender

# Only what the package needs (.dockerignore lets nothing else in). devkit/ (mock provider,
# test deployments) stays out: `batchsender mock-provider` and `all` run from a checkout.
COPY . /src
RUN pip install /src && rm -rf /src

# Settings come from the environment (Kubernetes Secret / --env-file); no .env file in the image.
# In a container the API has to listen on all interfaces to be reachable through EXPOSE.
ENV BATCHSENDER_ENV=prod \
    API_HOST=0.0.0.0 \
    API_PORT=6001 \
    METRICS_DIR=/tmp/batchsender-metrics

USER batchsender
WORKDIR /home/batchsender
EXPOSE 6001
CMD ["batchsender", "worker"]
