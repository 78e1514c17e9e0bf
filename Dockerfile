# syntax=docker/dockerfile:1
# The salon-reports service image: `docker compose build`, or
# `docker build -t salon-reports:0.1.0 .` (the build context is filtered by .dockerignore).
#
# At start it migrates the database, seeds the demo dataset when SEED_DEMO=1 and the database
# has no bookings yet, then serves on 0.0.0.0:8000 with two workers. It runs as production:
# without a REPORTS_JWT_SECRET of at least 32 random bytes it refuses to start.

# ---- build: wheels of the project and of every dependency ---------------------------------
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY telemetry ./telemetry
COPY benchmarks ./benchmarks
COPY migrations ./migrations
RUN pip wheel --wheel-dir /wheels .

# ---- runtime --------------------------------------------------------------------------------
FROM python:3.11.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REPORTS_ENVIRONMENT=production \
    SEED_DEMO=0
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels salon-reports \
 && useradd --system --uid 10001 --home-dir /app --create-home app
WORKDIR /app
USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["sh", "-c", "salon-reports migrate && if [ \"$SEED_DEMO\" = 1 ]; then salon-reports seed --if-empty; fi && exec salon-reports serve --host 0.0.0.0 --port 8000 --workers 2"]
