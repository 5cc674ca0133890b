"""The vmupdate custom resources as pydantic models: the single source of truth.

The CRDs under ``crds/`` and ``charts/vmupdate/crds/`` are generated from these models by
``python -m vmupdate_api.crdgen`` (a drift test keeps them equal). The models use snake_case
attributes in Python and camelCase names on the wire (``model_dump(by_alias=True)``, or
:meth:`~vmupdate_api.crd.meta.K8sModel.to_wire`); both spellings are accepted when validating.

Admission rules live next to the fields they constrain, as
:class:`~vmupdate_api.crd.rules.Rule` objects: each one carries the CEL expression the API
server runs (``x-kubernetes-validations``), the message a person sees, and, where it can be
judged from one object alone, the same check in Python, so the operator and the tests reject
exactly what the API server rejects, with the same words.

Resources (group ``vmupdate.dev``, version ``v1alpha1``, all cluster-scoped):

* **VMUpdate** -- the QEMU a set of VMs must run. Desired state, converged continuously: VMs
  that appear later are updated too. Editing the spec starts a new rollout for the new
  generation (as with a Deployment); earlier rollouts are kept in ``status.history``.
* **VMHost** -- one per node, named after the node and written by that node's agent: the
  agent's endpoint, the QEMU binaries on the host and one row per VM.
* **VMUpdateHost** -- a VMUpdate's record of each selected VM on one host (owned by the
  VMUpdate, written by the operator), so that the VMUpdate's own status stays bounded
  whatever the fleet: counts, the first in-flight and failed VMs, the history.

Modules (every name has one home; this package re-exports nothing):

* ``constants`` -- the API's names (group, version, kinds, plurals, labels) and size limits.
* ``rules`` -- admission rules (CEL and their Python twins) and the regular expressions the
  schemas share.
* ``meta`` -- :class:`~vmupdate_api.crd.meta.K8sModel` (the base of every model), wire names,
  timestamps, bounded string types, ObjectMeta, the status merge patch.
* ``conditions`` -- condition types and reasons, the Condition model and
  :func:`~vmupdate_api.crd.conditions.condition`, which sets one.
* ``vmupdate_spec`` -- what a user writes in a VMUpdate: selector, target, mode, strategy.
* ``vmupdate`` -- the VMUpdate object and what the operator reports in it: phases (with the
  table of phases and conditions), one row per VM, history, status.
* ``vmhost`` -- the VMHost object an agent writes: binaries, VMs, health.
* ``vmupdatehost`` -- the VMUpdateHost object: a VMUpdate's per-VM records on one host.
"""
