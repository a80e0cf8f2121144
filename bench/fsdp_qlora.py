"""FSDP2 + QLoRA: LoRA adapters trained on an NF4 Llama-shaped base, sharded with ``fully_shard``.

Each rank builds the same random Llama-shaped model in bfloat16 on its GPU (or loads ``--model``
with ``quantcore.from_pretrained(..., device_map={"": local_rank})``), quantizes it with quantcore to
NF4 with ``bnb_4bit_quant_storage=torch.bfloat16`` (packed weights in the same dtype as every other
parameter, so FSDP shards them like any bf16 tensor), wraps each quantized linear in a small LoRA
module (bf16 A/B, base frozen), then shards each decoder layer and the root with FSDP2. A few
steps of forward, backward and AdamW on random tokens follow; each rank prints its step time and
peak memory, and the run checks that the loss is finite and every adapter got a gradient.

    torchrun --nproc-per-node 1 bench/fsdp_qlora.py               # one GPU (smoke test)
    torchrun --nproc-per-node 2 bench/fsdp_qlora.py --layers 16   # two GPUs
    python bench/fsdp_qlora.py --dry-run-cpu                      # no GPU: build, wrap, one step on the CPU

``--json PATH`` writes rank 0's results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# Multi-GPU hosts here must keep NVLink multicast off (NCCL NVLS and torch's symmetric memory).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))``: a frozen (quantized) linear with a trainable low-rank update.

    ``B`` starts at zero, so the wrapped model computes what the base computes until it trains.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return self.base(x) + self.scale * update.to(x.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float, dtype: torch.dtype) -> list[str]:
    """Freeze every parameter, then wrap each quantized projection in a :class:`LoRALinear`; returns their names."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and hasattr(child, "in_features"):
                device = next(t.device for t in child.parameters())
                setattr(module, child_name, LoRALinear(child, rank, alpha, dtype, device))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


def build(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The NF4 base model on ``device``: from ``--model`` or random, quantized by quantcore."""
    import transformers
    from quantcore_bnb import BitsAndBytesConfig

    import quantcore

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    if args.model:
        index = device.index if device.type == "cuda" else "cpu"
        return quantcore.from_pretrained(args.model, config, dtype=torch.bfloat16, device_map={"": index})
    llama = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 128),
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # every rank builds the same weights
    with device:
        model = transformers.LlamaForCausalLM(llama).to(torch.bfloat16)
    quantcore.quantize(model, config)
    return model


def shard(model: nn.Module, mesh: object) -> None:
    """FSDP2: each decoder layer its own unit, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def train(model: nn.Module, args: argparse.Namespace, device: torch.device, rank: int) -> dict:
    """``--steps`` steps of AdamW on random tokens; the adapters must get gradients, the loss stay finite."""
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    optimizer = torch.optim.AdamW(adapters, lr=1e-4)
    generator = torch.Generator(device="cpu").manual_seed(1234 + rank)
    model.train()
    times, losses = [], []
    graded = False
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        graded = all(p.grad is not None and bool(torch.isfinite(_local(p.grad)).all()) for p in adapters)
        if not graded:
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "losses": losses,
        "step_seconds": times,
        "adapters": len(adapters),
        "adapters_got_gradients": graded,
        "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
    }


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters and gradients), or the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a bf16/fp32 transformers checkpoint folder (default: a random Llama)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=0, help="default: 8/3 of --hidden, rounded to 64")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--json", help="write rank 0's results here")
    parser.add_argument(
        "--dry-run-cpu", action="store_true", help="no GPU: build, quantize, wrap and train on the CPU, no FSDP"
    )
    args = parser.parse_args(argv)

    if args.dry_run_cpu:
        args.vocab = min(args.vocab, 256)
        args.seq = min(args.seq, 16)
        model = build(args, torch.device("cpu"))
        wrapped = add_lora(model, args.lora_rank, args.lora_alpha, torch.bfloat16)
        result = train(model, args, torch.device("cpu"), 0)
        ok = result["loss_finite"] and result["adapters_got_gradients"] and len(wrapped) == 7 * args.layers
        print(json.dumps({"wrapped": len(wrapped), **result}))
        print("dry run ok" if ok else "dry run FAILED")
        return 0 if ok else 1

    if not torch.cuda.is_available():
        print(
            "fsdp_qlora.py needs CUDA GPUs (FSDP2 over NCCL): run it with "
            "`torchrun --nproc-per-node N bench/fsdp_qlora.py`, or try `--dry-run-cpu` here",
            file=sys.stderr,
        )
        return 2
    if "LOCAL_RANK" not in os.environ:
        print("launch with torchrun: torchrun --nproc-per-node N bench/fsdp_qlora.py [...]", file=sys.stderr)
        return 2

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    local_rank = int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rank = dist.get_rank()
    mesh = init_device_mesh("cuda", (world,))
    try:
        start = time.perf_counter()
        model = build(args, device)
        wrapped = add_lora(model, args.lora_rank, args.lora_alpha, torch.bfloat16)
        built = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats(device)
        shard(model, mesh)
        result = train(model, args, device, rank)
        result.update(
            rank=rank,
            world_size=world,
            wrapped=len(wrapped),
            build_seconds=built,
            peak_memory_bytes=torch.cuda.max_memory_allocated(device),
            gpu=torch.cuda.get_device_name(device),
        )
        steps = result["step_seconds"]
        print(
            f"[rank {rank}/{world}] loss {result['losses'][-1] if result['losses'] else float('nan'):.4f} "
            f"step {sum(steps[1:]) / max(1, len(steps) - 1):.3f}s (first {steps[0] if steps else float('nan'):.3f}s) "
            f"peak {result['peak_memory_bytes'] / 2**30:.2f} GiB adapters-graded {result['adapters_got_gradients']}",
            flush=True,
        )
        everyone: list[dict | None] = [None] * world
        dist.all_gather_object(everyone, result)
        ok = all(r is not None and r["loss_finite"] and r["adapters_got_gradients"] for r in everyone)
        if rank == 0:
            if args.json:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump({"args": vars(args), "ranks": everyone}, f, indent=2)
            print("FSDP2 QLoRA ok" if ok else "FSDP2 QLoRA FAILED", flush=True)
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
