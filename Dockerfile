# One image, two entry points: the operator (Deployment) and the node agent (DaemonSet).
#   operator: vmupdate-operator                                  (default; runs as nobody)
#   agent:    vmupdate-agent serve --config /etc/vmupdate/agent.yaml   (the pod sets user 0)
# The agent pod must be privileged with hostPID and the host's /run/vmupdate (runtime dir,
# shared with the VMs at the same path) and /var/lib/vmupdate (journal) mounted; see README.
# Without a registry, e2e/image/build.sh provides both FROM images from Debian packages.

FROM debian:bookworm-slim AS guard
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY node-agent/guard/ /src/guard/
# Static, so it runs unchanged inside any VM root (chroot, container image).
RUN sh /src/guard/build.sh /out

# The wheels are built and installed here (into /install, as if it were /), so the final stage
# needs no build tools and gets the installed files by a COPY, which every builder's layer
# cache keys by content (buildah's does not look into a RUN's bind mount of another stage).
FROM python:3.11-slim-bookworm AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api/ api/
COPY operator/ operator/
COPY node-agent/ node-agent/
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
    && pip install --no-cache-dir --no-index --find-links /wheels --root /install vmupdate

FROM python:3.11-slim-bookworm
# util-linux: nsenter and setsid, the agent's default host_exec_prefix and detach_prefix.
RUN apt-get update && apt-get install -y --no-install-recommends util-linux \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheels /install/ /
COPY --from=guard /out/vmupdate-cpr-guard /usr/lib/vmupdate/vmupdate-cpr-guard
# The agent installs this prebuilt guard into its runtime dir (agent.yaml: guard_binary).
ENV VMUPDATE_GUARD_BINARY=/usr/lib/vmupdate/vmupdate-cpr-guard
# The operator needs no privilege: nobody. The agent's pod runs it as root (the chart).
USER 65534:65534
ENTRYPOINT []
CMD ["vmupdate-operator"]
