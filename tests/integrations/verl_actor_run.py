"""One update of verl 0.9.1's own actor on CPU, one gloo rank, run in a fresh process by
tests/integrations/test_verl_actor.py:

    python verl_actor_run.py OUT MODEL_DIR LOSS_MODE [--fused-head verl|ppo_fast] [--fp32]

ActorRolloutRefWorker(role="actor").init_model() (verl's config file, its FSDP2 engine
FSDPEngineWithLMHead, the loss partial(verl.workers.utils.losses.ppo_loss, config)), then
update_actor() on one mini-batch in verl's no-padding TensorDict format; OUT gets the metrics, the
parameters after the step and how many times ppo_fast's fused head ran. verl's defaults (fp32 master
parameters, bf16 mixed precision), or with --fp32 none (the forward in fp32 too).

What stands in for a GPU machine (nothing of the loss or the head):
- PlatformCPU: verl's platform registry knows accelerators only; this one reports the CPU (no device
  memory, no profiler) and is chosen with VERL_PLATFORM=cpu;
- VERL_ENGINE_DEVICE=cuda picks FSDPEngineWithLMHead, which verl registers for cuda and npu only; it
  then runs on the platform's device, the CPU;
- the gloo process group is made here (verl's own backend string would name cpu twice);
- sdpa attention (flash-attn cannot be built here);
- TRL's value-head state_dict patch is skipped (TRL 1.16 moved that class; not on the actor's path);
- ray, uvicorn, fastapi: tests/peers.py's sitecustomize (imported by verl's modules, unused here).
"""
import contextlib
import sys
import types

import torch
import torch.distributed as dist
from verl.plugin.platform import PlatformBase, PlatformRegistry


class _CPUDevice(types.ModuleType):
    """torch.cpu, with the memory queries a GPU module has answering 0."""

    def __getattr__(self, name):
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name == "get_device_name":
            return lambda *a, **k: "CPU"
        if name == "mem_get_info":
            return lambda *a, **k: (0, 0)
        if name.startswith(("max_memory", "memory_", "reset_")) or name in ("empty_cache", "ipc_collect"):
            return lambda *a, **k: 0
        raise AttributeError(name)


@PlatformRegistry.register("cpu")
class PlatformCPU(PlatformBase):
    device_name, vendor_name, device_module = "cpu", "cpu", _CPUDevice("verl_cpu_device")

    def is_available(self): return True
    def current_device(self): return "cpu"  # verl moves modules with .to(device=current_device())
    def device_count(self): return 1
    def set_device(self, index): pass
    def synchronize(self, index=None): pass
    def manual_seed(self, seed): torch.manual_seed(seed)
    def manual_seed_all(self, seed): torch.manual_seed(seed)
    def set_allocator_settings(self, settings): pass
    def empty_cache(self): pass
    def get_device_capability(self, index=0): return (None, None)
    def communication_backend_name(self): return "gloo"
    def visible_devices_envvar(self): return "CUDA_VISIBLE_DEVICES"
    @contextlib.contextmanager
    def nvtx_range(self, msg): yield
    def profiler_start(self): pass
    def profiler_stop(self): pass
    def ray_resource_name(self): return "CPU"
    def ray_noset_envvars(self): return []
    def is_ipc_supported(self): return False
    def cudart(self): return None


def actor_config(model_dir, loss_mode, fused_head, fp32):
    from omegaconf import OmegaConf
    from verl.trainer import config as verl_config

    cfg = OmegaConf.load(f"{verl_config.__path__[0]}/_generated_ppo_trainer.yaml").actor_rollout_ref
    cfg.model.path = model_dir
    cfg.model.override_config = {"attn_implementation": "sdpa"}
    if fused_head:
        cfg.model.use_fused_kernels = True
        if fused_head == "ppo_fast":
            cfg.model.external_lib = "ppo_fast.integrations.verl_fused_head"
    actor = cfg.actor
    actor.strategy = actor.fsdp_config.strategy = "fsdp2"
    actor.fsdp_config.model_dtype = "fp32"
    if fp32:
        actor.fsdp_config.mixed_precision = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    actor.use_torch_compile = actor.fsdp_config.use_torch_compile = False
    actor.ppo_mini_batch_size, actor.ppo_micro_batch_size_per_gpu = 4, 2
    actor.optim.lr, actor.entropy_coeff, actor.calculate_entropy = 1e-2, 0.01, True
    actor.policy_loss.loss_mode = loss_mode
    cfg.rollout.log_prob_micro_batch_size_per_gpu = 2
    return cfg


def mini_batch():
    """Four sequences, a left-padded prompt and ragged responses, old log-probs and advantages, as
    verl's trainer hands them to update_actor."""
    import verl.utils.tensordict_utils as tu
    from tensordict import TensorDict
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(0)
    B, P, R = 4, 3, 5
    prompts, responses = torch.randint(3, 24, (B, P), generator=g), torch.randint(1, 24, (B, R), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0
    response_mask = (torch.arange(R)[None] < torch.tensor([[5], [3], [1], [4]])).long()
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    batch = TensorDict({"input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention_mask,
                        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0), "prompts": prompts,
                        "responses": responses, "response_mask": response_mask,
                        "old_log_probs": -3.2 + 0.3 * torch.randn(B, R, generator=g),
                        "advantages": torch.randn(B, 1, generator=g).expand(B, R) * response_mask}, batch_size=[B])
    tu.assign_non_tensor(batch, temperature=1.0, multi_turn=False)
    batch = left_right_2_no_padding(batch)
    tu.assign_non_tensor(batch, calculate_entropy=True, distillation_use_topk=False, distillation_only=False,
                         global_batch_size=B, mini_batch_size=B, epochs=1, seed=1, dataloader_kwargs={"shuffle": False},
                         compute_loss=True)
    return batch


def main(out, model_dir, loss_mode, fused_head=None, fp32=False):
    import verl.models.transformers.monkey_patch as monkey_patch
    import verl.utils.tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from ppo_fast.integrations import verl as pf_verl

    monkey_patch.is_trl_available = lambda: False
    calls = {"ppo_fast_head": 0}
    forward = pf_verl.FusedLinearForPPO.forward

    def counted(self, *args, **kwargs):
        calls["ppo_fast_head"] += 1
        return forward(self, *args, **kwargs)

    pf_verl.FusedLinearForPPO.forward = counted
    dist.init_process_group("gloo")
    worker = ActorRolloutRefWorker(actor_config(model_dir, loss_mode, fused_head, fp32), role="actor")
    worker.init_model()
    metrics = tu.get(worker.update_actor(mini_batch()), "metrics")
    module = worker.actor.engine.module
    params = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for name, p in module.named_parameters()}
    logged = {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in metrics.items()
              if not k.startswith("perf") and k != "mfu"}  # mfu and memory: of the machine, not the update
    torch.save({"metrics": logged,
                "params": params, **calls}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    head = args[args.index("--fused-head") + 1] if "--fused-head" in args else None
    main(*args[:3], fused_head=head, fp32="--fp32" in args)
