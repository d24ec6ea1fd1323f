"""Ahead-of-time compile of kernels for the H100 (sm_90) without a GPU.

Run as a script in a process where TRITON_INTERPRET is unset (the interpreter replaces the
kernels). ``python aot_compile.py pooling`` prints one JSON line per compiled case with the
cubin's resource usage (registers, stack, local memory: local > 0 means register spills) and
facts read off the PTX.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# Sizes and strides that are multiples of 16 for the usual shapes (H = 384, 768, 1024, ...);
# Triton specializes such arguments at run time, so the aligned cases are the ones that run.
ALIGNED_SIZES = {
    "hidden", "stride_x_batch", "stride_x_seq", "stride_mask_batch", "stride_grad_batch",
    "dim", "stride_q", "stride_k", "stride_x", "stride_y", "stride_dots", "stride_w", "stride_dots_dim",
    "stride_w_dim",
}  # fmt: skip
VECTOR_LOAD = re.compile(r"ld\.global(\.\w+)*\.v4|cp\.async\.cg\.shared\.global[^;]*0x10")
"""A 16-byte load in PTX: a vector load into registers or an asynchronous copy to shared memory."""
TRITON_DTYPES = {"fp64": tl.float64, "fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}


def cuobjdump(cubin: bytes, option: str) -> str:
    """Triton's bundled ``cuobjdump`` run with ``option`` on a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        completed = subprocess.run([CUOBJDUMP, option, file.name], capture_output=True, text=True, check=True)
    return completed.stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    report = cuobjdump(cubin, "--dump-resource-usage")
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", report)}


def make_case(
    module: str, name: str, pointers: dict, constexprs: dict, num_warps: int, *, aligned, int64_strides,
    num_stages: int = 3,
):  # fmt: skip
    """One compile job. Arguments named ``*_ptr`` take the pointer type ``pointers`` gives them,
    fp32 by default (16-byte aligned, as PyTorch allocates); ``stride_*`` arguments are int64 when
    ``int64_strides`` (Triton's choice for values past 2**31), other integers int32; with
    ``aligned`` the arguments in ``ALIGNED_SIZES`` are known multiples of 16."""
    kernel = getattr(importlib.import_module(module), name)
    signature, attrs = {}, {}
    for index, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + pointers.get(arg, "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i64" if int64_strides and arg.startswith("stride") else "i32"
            if aligned and arg in ALIGNED_SIZES:
                attrs[(index,)] = [["tt.divisibility", 16]]
    pointer_text = " ".join(f"{arg}={dtype}" for arg, dtype in pointers.items())
    layout = f"{'aligned' if aligned else 'unaligned'}{' int64-strides' if int64_strides else ''}"
    label = f"{name} {pointer_text} {layout} {constexprs} num_warps={num_warps}"
    return (
        label,
        (module, name),
        signature,
        constexprs,
        attrs,
        {"num_warps": num_warps, "num_stages": num_stages},
    )


def pooling_cases():
    """Every launch configuration x every input dtype, padded and packed, with the argument types
    and alignment the launcher produces for the usual shapes (H and strides multiples of 16),
    plus unaligned and int64-stride variants with other mask and offset dtypes for the half
    types."""
    from simcse_fast import pooling

    variants = [(dtype, "u8", "i64", True, False) for dtype in TRITON_DTYPES]
    variants += [
        ("bf16", "i64", "i32", False, False),
        ("bf16", "fp32", "i64", True, True),
        ("fp16", "i32", "i32", False, True),
    ]
    for (kind, _), config in pooling.POOLING_CONFIGS.items():
        blocks = {"BLOCK_L": config.block_l, "BLOCK_H": config.block_h}
        name = f"_{kind.replace('_', '_pool_', 1)}_kernel"
        for (dtype, mask_dtype, offsets_dtype, aligned, int64_strides), packed in itertools.product(
            variants, (False, True)
        ):
            if packed and (dtype, mask_dtype) not in (("bf16", "u8"), ("fp16", "i32")):
                continue  # a packed batch has no mask: one variant per offset dtype and alignment suffices
            pointers = {
                "x_ptr": dtype, "grad_x_ptr": dtype, "out_ptr": dtype, "grad_out_ptr": dtype,
                "mask_ptr": offsets_dtype if packed else mask_dtype, "cu_seqlens_ptr": offsets_dtype,
                "argmax_ptr": "i32",
            }  # fmt: skip
            kernel = getattr(pooling, name)
            constexprs = {**blocks, "PACKED": packed}
            if "ACC_DTYPE" in kernel.arg_names:
                constexprs["ACC_DTYPE"] = tl.float64 if dtype == "fp64" else tl.float32
            if "NUM_STAGES" in kernel.arg_names:
                constexprs["NUM_STAGES"] = pooling.PIPELINED_STAGES if aligned else 1
            used = {arg: pointers[arg] for arg in kernel.arg_names if arg in pointers}
            yield make_case(
                "simcse_fast.pooling", name, used, constexprs, config.num_warps,
                aligned=aligned, int64_strides=int64_strides,
            )  # fmt: skip


def compile_case(case) -> dict:
    label, (module, name), signature, constexprs, attrs, options = case
    kernel = getattr(importlib.import_module(module), name)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=H100, options=options)
    ptx = compiled.asm["ptx"]
    return {
        "case": label,
        "kernel": name,
        "block_h": constexprs.get("BLOCK_H"),
        "packed": constexprs.get("PACKED"),
        **resource_usage(compiled.asm["cubin"]),
        # Asynchronous 16-byte global-to-shared copies: how Triton's pipeliner issues a tile's loads.
        "async_copies": cuobjdump(compiled.asm["cubin"], "-sass").count("LDGSTS.E.BYPASS.128"),
        "vector_loads": bool(VECTOR_LOAD.search(ptx)),
        "vector_stores": bool(re.search(r"st\.global(\.\w+)*\.v4", ptx)),
        "wgmma": "wgmma" in ptx,
        "dynamic_shared": compiled.metadata.shared,
    }


FORWARD_FLAGS = [
    {"EXCLUDE": 0, "POSITIVE": 0},
    {"EXCLUDE": 1, "POSITIVE": 0},  # exclude_diagonal, query_to_query
    {"EXCLUDE": 2, "POSITIVE": 0},  # doc_to_doc
    {"EXCLUDE": 0, "POSITIVE": 1},
    {"EXCLUDE": 0, "POSITIVE": 2},
]
WEIGHTS_FLAGS = [  # (ROW_TERMS, COL_TERMS, POSITIVE, EXCLUDE): which block of which loss
    (True, False, 0, 0),  # similarity_logsumexp
    (True, False, 0, 1),  # its exclude_diagonal; query_to_query blocks
    (True, False, 0, 2),  # doc_to_doc blocks
    (True, False, 1, 0),  # info_nce, sentence-transformers without doc_to_query
    (True, False, 2, 0),  # info_nce with labels
    (True, True, 1, 0),  # symmetric info_nce, doc_to_query
    (False, True, 0, 0),  # doc_to_query over gathered queries
]
HEAVIEST_FORWARD = [{"EXCLUDE": 2, "POSITIVE": 0}, {"EXCLUDE": 0, "POSITIVE": 2}]
HEAVIEST_WEIGHTS = [((True, True, 1, 0), True), ((True, False, 2, 0), True), ((True, False, 0, 2), True)]
"""The flags that need the most registers (the symmetric block with a learnable scale, labels,
exclusion): every tile of the tuned space is compiled with these, every flag combination with
each dtype's default tile and with the gemm strategy's pass."""


def _similarity_case(
    kernel: str, dtype: str, precision: str, config, flags: dict, precomputed: bool, guide_dtype: str = "bf16"
):  # fmt: skip
    from simcse_fast.similarity import kernels

    pointers = {
        "x_ptr": dtype,
        "y_ptr": dtype,
        "q_ptr": dtype,
        "k_ptr": dtype,
        "w_ptr": dtype,
        "gx_ptr": guide_dtype,
        "gy_ptr": guide_dtype,
        "labels_ptr": "i64",
    }
    flags = {"HARDNESS": 0, "GUIDED": 0, **flags}
    if kernel == "forward":
        name = "_lse_partial_kernel"
        blocks = {"BLOCK_N": config.block_rows, "BLOCK_M": config.block_cols, "BLOCK_D": config.block_d}
    else:
        name = "_gradient_weights_kernel"
        config = kernels.weights_tile(config, flags["ROW_TERMS"] and flags["COL_TERMS"])
        blocks = {"BLOCK_R": config.block_rows, "BLOCK_C": config.block_cols, "BLOCK_D": config.block_d}
        blocks["GROUP_R"] = config.group_rows
    used = {arg: dtype for arg, dtype in pointers.items() if arg in getattr(kernels, name).arg_names}
    if not flags["GUIDED"]:  # unused guide pointers keep the default type and stay out of the label
        del used["gx_ptr"], used["gy_ptr"]
    constexprs = {**flags, **blocks, "PRECOMPUTED": precomputed, "DOT_PRECISION": precision}
    constexprs["GUIDE_PRECISION"] = "ieee"
    label, *rest = make_case(
        "simcse_fast.similarity.kernels", name, used, constexprs, config.num_warps,
        aligned=True, int64_strides=False, num_stages=config.num_stages,
    )  # fmt: skip
    return (f"{label} tile={config.name}", *rest)


def _weights_flags(flag_set, scale_grad) -> dict:
    row_terms, col_terms, positive, exclude = flag_set
    return {"ROW_TERMS": row_terms, "COL_TERMS": col_terms, "POSITIVE": positive, "EXCLUDE": exclude,
            "SCALE_GRAD": scale_grad}  # fmt: skip


def similarity_cases():
    """The forward kernel and the gradient-weights kernel, at the configurations the launchers use
    (D and row strides are multiples of 16, base pointers 16-byte aligned, which ``Side``
    guarantees by padding or copying):

    * the fused strategy's default tile for each input dtype (fp32 with and without TF32), every
      flag combination;
    * every other tile of the tuned space (bf16), with the heaviest flags;
    * the gemm strategy's pass (``PRECOMPUTED``), every flag combination, ``W`` in bf16, and the
      heaviest flags with ``W`` in fp16 and fp32."""
    from simcse_fast.similarity import kernels

    for dtype, precision in [("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32")]:
        config = kernels.fused_config(4 if dtype == "fp32" else 2)
        for flags in FORWARD_FLAGS:
            yield _similarity_case("forward", dtype, precision, config, flags, False)
        for flag_set, scale_grad in itertools.product(WEIGHTS_FLAGS, (False, True)):
            yield _similarity_case(
                "weights", dtype, precision, config, _weights_flags(flag_set, scale_grad), False
            )
    for config in kernels.FUSED_CONFIGS[2][1:]:
        for flags in HEAVIEST_FORWARD:
            yield _similarity_case("forward", "bf16", "ieee", config, flags, False)
        for flag_set, scale_grad in HEAVIEST_WEIGHTS:
            yield _similarity_case(
                "weights", "bf16", "ieee", config, _weights_flags(flag_set, scale_grad), False
            )
    forward_pass, weights_pass = kernels.PASS_CONFIGS["forward"], kernels.PASS_CONFIGS["weights"]
    for flags in FORWARD_FLAGS:
        yield _similarity_case("forward", "bf16", "ieee", forward_pass, flags, True)
    for flag_set, scale_grad in itertools.product(WEIGHTS_FLAGS, (False, True)):
        yield _similarity_case(
            "weights", "bf16", "ieee", weights_pass, _weights_flags(flag_set, scale_grad), True
        )
    for dtype in ("fp16", "fp32"):
        yield _similarity_case(
            "weights", dtype, "ieee", weights_pass, _weights_flags(*HEAVIEST_WEIGHTS[0]), True
        )
    yield from adjusted_cases()


def adjusted_cases():
    """Hardness weighting (sentence-transformers' three modes) and GIST's guided mask, bf16, with
    the default tile (every mode) and the gemm pass (one of each): the row logits' adjustment
    adds the guide's tile or a second logit tile to the kernels."""
    from simcse_fast.similarity import kernels

    tile, forward_pass, weights_pass = (
        kernels.fused_config(2),
        kernels.PASS_CONFIGS["forward"],
        kernels.PASS_CONFIGS["weights"],
    )
    forward = [{"POSITIVE": 1, "EXCLUDE": 0, "HARDNESS": mode} for mode in (1, 2, 3)]
    forward += [{"POSITIVE": 1, "EXCLUDE": 0, "GUIDED": 1}, {"POSITIVE": 0, "EXCLUDE": 0, "GUIDED": 2}]
    weights = [{**_weights_flags((True, False, 1, 0), True), "HARDNESS": mode} for mode in (1, 2, 3)]
    weights.append({**_weights_flags((True, True, 1, 0), True), "HARDNESS": 1})  # symmetric
    weights.append({**_weights_flags((True, False, 1, 0), True), "GUIDED": 1})
    weights.append({**_weights_flags((True, False, 0, 0), True), "GUIDED": 2})
    for flags in forward:
        yield _similarity_case("forward", "bf16", "ieee", tile, flags, False)
    for flags in weights:
        yield _similarity_case("weights", "bf16", "ieee", tile, flags, False)
    for flags in (forward[0], forward[3]):
        yield _similarity_case("forward", "bf16", "ieee", forward_pass, flags, True)
    for flags in (weights[3], weights[4]):
        yield _similarity_case("weights", "bf16", "ieee", weights_pass, flags, True)
    # A guide in fp32 beside a bf16 model.
    yield _similarity_case("weights", "bf16", "ieee", tile, weights[4], False, guide_dtype="fp32")


MATRYOSHKA_HEAVIEST = (True, True, 1, 0)
"""The symmetric block (row and column terms, a positive): the most registers."""


MATRYOSHKA_ADJUSTED = [
    ((True, False, 1, 0), {"HARDNESS": 1}),  # hardness weighting, each mode
    ((True, False, 1, 0), {"HARDNESS": 2}),
    ((True, False, 1, 0), {"HARDNESS": 3}),
    (MATRYOSHKA_HEAVIEST, {"HARDNESS": 1}),  # the symmetric block with hardness
    ((True, False, 1, 0), {"GUIDED": 1}),  # GIST's query_to_doc block
    ((True, False, 0, 0), {"GUIDED": 2}),  # GIST's same-type blocks
]
"""Hardness weighting and GIST's guide in the Matryoshka weights kernel (bf16 ``What``): each
dimension's cosines a second time for hardness, the tile's guide mask formed once from the
chunk's guide dot products."""


def matryoshka_cases():
    """The Matryoshka loss's weights kernel (a pass over K chunks of precomputed dot products),
    at the tile its launcher uses: every flag set of the single-dimension weights kernel with
    ``What`` in bf16, the heaviest with ``What`` in fp16 and fp32, and the adjusted row softmaxes
    (``MATRYOSHKA_ADJUSTED``)."""
    from simcse_fast.similarity import matryoshka

    config = matryoshka.MATRYOSHKA_PASS
    cases = [(flag_set, {}, "bf16") for flag_set in WEIGHTS_FLAGS]
    cases += [(MATRYOSHKA_HEAVIEST, {}, dtype) for dtype in ("fp16", "fp32")]
    cases += [(flag_set, adjustment, "bf16") for flag_set, adjustment in MATRYOSHKA_ADJUSTED]
    for (row_terms, col_terms, positive, exclude), adjustment, dtype in cases:
        constexprs = {
            "ROW_TERMS": row_terms, "COL_TERMS": col_terms, "POSITIVE": positive, "EXCLUDE": exclude,
            "HARDNESS": 0, "GUIDED": 0, **adjustment, "GUIDE_PRECISION": "ieee",
            "ROW_FIELDS": matryoshka.ROW_FIELDS, "COL_FIELDS": matryoshka.COL_FIELDS,
            "BLOCK_R": config.block_rows, "BLOCK_C": config.block_cols,
        }  # fmt: skip
        label, source, signature, constexprs, attrs, options = make_case(
            "simcse_fast.similarity.matryoshka", "_matryoshka_weights_kernel",
            {"w_ptr": dtype, "labels_ptr": "i64"}, constexprs, config.num_warps,
            aligned=True, int64_strides=False, num_stages=config.num_stages,
        )  # fmt: skip
        # The columns (keys) are a multiple of 16 at the usual batch sizes, which Triton
        # specializes at run time: the column mask is then uniform over a vector.
        attrs[(list(signature).index("n_cols"),)] = [["tt.divisibility", 16]]
        yield (f"{label} tile={config.name}", source, signature, constexprs, attrs, options)


CASES = {"pooling": pooling_cases, "similarity": similarity_cases, "matryoshka": matryoshka_cases}

if __name__ == "__main__":
    cases = [case for name in sys.argv[1:] for case in CASES[name]()]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for result in pool.map(compile_case, cases):
            print(json.dumps(result), flush=True)
