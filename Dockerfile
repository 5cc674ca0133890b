# One image, two entry points: the operator (Deployment) and the node agent (DaemonSet).
#   operator: vmupdate-operator
#   agent:    vmupdate-agent serve --config /etc/vmupdate/agent.yaml
# The agent pod must be privileged with hostPID and the host's /run/vmupdate (runtime dir,
# shared with the VMs at the same path) and /var/lib/vmupdate (journal) mounted; see README.

FROM debian:bookworm-slim AS guard
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY node-agent/guard/ /src/guard/
# Static, so it runs unchanged inside any VM root (chroot, container image).
RUN sh /src/guard/build.sh /out

FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends util-linux \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api/ api/
COPY operator/ operator/
COPY node-agent/ node-agent/
RUN pip install --no-cache-dir . && rm -rf /src
COPY --from=guard /out/vmupdate-cpr-guard /usr/lib/vmupdate/vmupdate-cpr-guard
# The agent installs this prebuilt guard into its runtime dir (agent.yaml: guard_binary).
ENV VMUPDATE_GUARD_BINARY=/usr/lib/vmupdate/vmupdate-cpr-guard
USER 0
ENTRYPOINT []
CMD ["vmupdate-operator"]
