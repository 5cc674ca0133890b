"""Names and bounds of the vmupdate API: group, version, kinds, plurals, labels, size limits.

The one home of every name the API server, kopf's handlers and kubectl see, and of the size
limits the models' schemas state.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "vmupdate.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "vmupdate.dev/v1alpha1"

KIND_VMUPDATE: Final = "VMUpdate"
PLURAL_VMUPDATES: Final = "vmupdates"
SINGULAR_VMUPDATE: Final = "vmupdate"
SHORT_NAMES_VMUPDATE: Final = ("vmu",)

KIND_VMHOST: Final = "VMHost"
PLURAL_VMHOSTS: Final = "vmhosts"
SINGULAR_VMHOST: Final = "vmhost"
SHORT_NAMES_VMHOST: Final = ("vmh",)

KIND_VMUPDATEHOST: Final = "VMUpdateHost"
PLURAL_VMUPDATEHOSTS: Final = "vmupdatehosts"
SINGULAR_VMUPDATEHOST: Final = "vmupdatehost"
SHORT_NAMES_VMUPDATEHOST: Final = ("vmuh",)

# Labels of a VMUpdateHost: its VMUpdate (by name when the name fits a label value, always by
# uid), its host (when it fits), and "true" while some VM of it failed.
LABEL_VMUPDATE: Final = f"{GROUP}/vmupdate"
LABEL_VMUPDATE_UID: Final = f"{GROUP}/vmupdate-uid"
LABEL_HOST: Final = f"{GROUP}/host"
LABEL_FAILED: Final = f"{GROUP}/failed"

# Size limits. The API server needs a bound on every string and list a CEL rule may touch
# (for its cost estimate); every other one is bounded too, to keep objects within etcd's size.
MAX_VM_ROWS = 100_000  # VMs one VMUpdate tracks (in its VMUpdateHost records and in memory)
MAX_LISTED_VMS = 20  # VMUpdate.status.inProgressVMs / failedVMs: the rest are only counted
MAX_HISTORY = 10  # VMUpdate.status.history: earlier rollouts kept
MAX_HOST_VMS = 512  # VMHost.status.vms, VMUpdateHost.status.vms
MAX_MESSAGE = 1024
MAX_PATH = 1024
MAX_NAME = 253
