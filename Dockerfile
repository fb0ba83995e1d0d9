# tallygate: the gateway on python:3.11-slim, running as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
COPY pricing ./pricing
COPY tiktoken_ext ./tiktoken_ext
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 tallygate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY config.yaml /app/config.yaml
# the tokenizer encodings come with the wheel (pricing/encodings, tiktoken_ext): nothing to
# download or mount
ENV TALLYGATE_CONFIG=/app/config.yaml PYTHONUNBUFFERED=1
RUN mkdir -p /app/data && chown -R tallygate /app
USER tallygate
EXPOSE 4000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:4000/healthz').status != 200)"
ENTRYPOINT ["tallygate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "4000"]
