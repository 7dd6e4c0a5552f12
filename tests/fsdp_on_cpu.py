"""Test-only launcher: finetune.py with real FSDP1 sharding over gloo on a CPU-only machine.

    accelerate launch --config_file <FSDP config, use_cpu true> tests/fsdp_on_cpu.py <finetune.py flags>

accelerate 1.15 does not run FSDP on the CPU: AcceleratorState switches to DistributedType.FSDP only for
GPU-like process groups (accelerate/state.py, the branch listing MULTI_GPU, MULTI_XPU, ...), so with
`use_cpu: true` the FSDP config quietly trains plain data parallel (MULTI_CPU), and with
`fsdp_cpu_ram_efficient_loading: true` the FSDP plugin refuses to start ("There are currently no available
devices found", accelerate/utils/dataclasses.py). torch's FSDP1 itself shards on the CPU. So here, and only
here, accelerate takes its FSDP path on MULTI_CPU with the device "cpu" (FSDP rejects accelerate's "cpu:0"
next to parameters on "cpu"), and finetune.py is told that the model is sharded (utils.modeling.sharding_here),
so it loads and trains the model as on GPUs: 4-bit weights in float storage, no fp32 upcast, no fused layers.
"""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def enable_fsdp_on_cpu():
    import accelerate.state
    import torch
    from accelerate.utils import DistributedType

    accelerator_state_init = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # every AcceleratorState() copies the process group's MULTI_CPU and "cpu:0" back in: override each time
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            self.distributed_type, self.fsdp_plugin, self.device = DistributedType.FSDP, plugin, torch.device("cpu")

    accelerate.state.AcceleratorState.__init__ = init

    sys.path.insert(0, ROOT)
    import utils.modeling
    utils.modeling.sharding_here = utils.modeling.sharded_engine
    print("fsdp_on_cpu: accelerate's FSDP path enabled on the CPU", flush=True)


if __name__ == "__main__":
    enable_fsdp_on_cpu()
    script = os.path.join(ROOT, "finetune.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")
