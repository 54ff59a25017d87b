"""Bytes each XLA fusion reads and writes, from an optimized HLO text dump.

    python3 hlo_traffic.py module_0000.jit_train_step.sm_9.0a_gpu_after_optimizations.txt [--min-mb 50]

Dump with XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_module_re=.*train.*". For every
fusion instruction outside fused computations: its operands' bytes (tuple elements
resolved through `name#k`) plus its outputs' bytes; fusions of the same signature
(bytes in, bytes out, output shape) are grouped, largest total first. Element-wise
work is bound by these bytes (~4.3 TB/s reached on an H200), so the table says where
a step's non-matmul time goes and what a smaller dtype or a saved intermediate costs.
"""

import argparse
import collections
import re

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "u8": 1, "s8": 1, "pred": 1, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8}
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\(")


def arrays(shape: str) -> list[int]:
    """Bytes of each array in an HLO shape string (a tuple gives several)."""
    out = []
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        if dtype in DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            out.append(n * DTYPE_BYTES[dtype])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hlo")
    ap.add_argument("--min-mb", type=float, default=50.0)
    args = ap.parse_args()
    lines = open(args.hlo).read().split("\n")
    shapes = {}
    for line in lines:
        if m := INSTRUCTION.match(line):
            shapes[m.group(1)] = m.group(2)

    def operand_bytes(name: str) -> int:
        base, _, k = name.partition("#")
        if base not in shapes:
            return 0
        sizes = arrays(shapes[base])
        return sizes[int(k)] if k else sum(sizes)

    groups = collections.defaultdict(list)
    for line in lines:
        m = INSTRUCTION.match(line)
        if not m or m.group(3) != "fusion" or not line.startswith("  "):
            continue
        ops = re.search(r"fusion\((.*?)\), kind", line)
        names = [o.strip().lstrip("%") for o in ops.group(1).split(",")] if ops else []
        names = [re.sub(r"^/\*index=\d+\*/", "", n).lstrip("%") for n in names]
        read = sum(operand_bytes(n) for n in names)
        written = sum(arrays(m.group(2)))
        if read + written >= args.min_mb * 1e6:
            groups[(round(read / 1e6), round(written / 1e6), m.group(2)[:70])].append(m.group(1))
    total = 0
    for (read, written, shape), names in sorted(groups.items(), key=lambda kv: -(kv[0][0] + kv[0][1]) * len(kv[1])):
        total += (read + written) * len(names)
        print(f"{len(names):4d} x read {read:6d} MB, write {written:6d} MB  {shape:70s} e.g. {names[0]}")
    print(f"total over fusions of >= {args.min_mb:g} MB: {total / 1e3:.1f} GB")


if __name__ == "__main__":
    main()
