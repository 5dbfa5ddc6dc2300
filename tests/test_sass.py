"""bench.sass on a CI-sized subset: the loop finder on hand-written SASS, one real kernel compiled for sm_90 and
disassembled with Triton's bundled tools, and the throughput model's arithmetic. No GPU needed."""

import pytest

from bench import sass
from kernels.formats import get_format

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R0, 0x4, RZ ;
.L_x_1:
        /*0020*/                   LDG.E.U8 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0040*/                   I2FP.F32.U32 R5, R4 ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R8, R10, R12 ;
        /*0060*/              @!P0 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""


# the same loop as Triton's bundled cuobjdump prints it: branch targets are addresses, there are no labels
SASS_ADDRESSES = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   IMAD R2, R0, 0x4, RZ ;                 /* 0x0000000400027824 */
        /*0020*/                   LDG.E.U8 R4, desc[UR4][R2.64] ;        /* 0x0000000402047981 */
        /*0030*/                   LDG.E.128 R8, desc[UR4][R6.64] ;       /* 0x0000000406087981 */
        /*0040*/                   I2FP.F32.U32 R5, R4 ;                  /* 0x0000000400057245 */
        /*0050*/                   HMMA.16816.F32.BF16 R12, R8, R10, R12 ; /* 0x0000000a080c723c */
        /*0060*/              @!P0 BRA 0x20 ;                              /* 0xfffffffc00ec8947 */
        /*0070*/               @P1 BRA 0x90 ;                              /* 0x0000000000041947 */
        /*0080*/                   STG.E [R2.64], R12 ;                   /* 0x0000000c02007986 */
        /*0090*/                   EXIT ;                                 /* 0x000000000000794d */
        /*00a0*/                   BRA 0xa0;                              /* 0xfffffffc00fc7947 */
"""


@pytest.mark.parametrize("text", [SASS, SASS_ADDRESSES], ids=["labels", "addresses"])
def test_main_loop_is_the_backward_branch_body(text):
    loop = sass.main_loop(text)
    assert loop == ["LDG.E.U8", "LDG.E.128", "I2FP.F32.U32", "HMMA.16816.F32.BF16", "BRA"]
    assert [sass.load_width(op) for op in loop[:2]] == [8, 128]
    assert [sass.CLASS_OF.get(op.split(".")[0], "other") for op in loop] == [
        "global load", "global load", "convert", "tensor", "other"]


@pytest.mark.parametrize("cc", [80, 90])
def test_scheduler_clocks_take_the_busiest_pipe(cc):
    """One instruction a clock, but integer and logic instructions (PRMT, LOP3) and IMAD one every other clock,
    conversions one every 8, float32 one a clock from sm_86 on (sharing it with IMAD), every other on sm_80."""
    assert sass.scheduler_clocks(["FFMA", "LDS.128", "BAR.SYNC", "BRA"], cc) == (4.0, "issue")
    assert sass.scheduler_clocks(["PRMT", "LOP3.LUT", "SHF.R.U32", "FFMA"], cc) == (6.0, "alu")
    assert sass.scheduler_clocks(["IMAD.MOV.U32"] * 3 + ["LDS"], cc) == (6.0, "fmaheavy")
    assert sass.scheduler_clocks(["I2F.F32.S8", "FFMA"], cc) == (8.0, "xu")
    fp32 = sass.scheduler_clocks(["FFMA"] * 3 + ["IMAD"], cc)
    assert fp32 == ((8.0, "fp32") if cc == 80 else (4.0, "issue"))
    assert sass.scheduler_clocks(["PRMT"] * 4, 100) == (4.0, "issue")  # no rates written down: issue alone


def test_model_takes_the_slowest_of_issue_tensor_and_memory():
    gpu = (90, 100, 1.0, 100.0, 1.0)  # 100 SMs at 1 GHz: 12.8e12 lane-instructions/s; 100 TFLOP/s; 1 TB/s
    row = dict(kernel="qmm", block_m=128, clocks_per_element=12.8)
    # issue: 12.8 * 1000 * 1000 * 1 tile / 12.8e12 = 1 us; tensor 2*128*1e6 / 1e14 = 2.56 us; memory ~0.5 us
    assert sass.launch_ms(row, gpu, 100, 5e5, K=1000, N=1000) == pytest.approx(2.56e-3)
    # the bf16 baseline pads a small M to 16 rows, not to its 128-row tile: 2 * 16 * 1e6 / 1e14 = 0.32 us
    bf16 = dict(kernel="bf16", block_m=128, clocks_per_element=0.0)
    assert sass.launch_ms(bf16, gpu, 1, 0, K=1000, N=1000) == pytest.approx(0.32e-3)
    gemv = dict(kernel="qmv", block_m=16, clocks_per_element=1.0)
    assert sass.launch_ms(gemv, gpu, 1, 1e7, K=1000, N=1000) == pytest.approx(1e7 * 1e3 / 1e12, rel=1e-3)


def test_the_gemm_estimate_takes_its_fastest_tile():
    """As the autotuner does: at M = 4608 a 256-row tile that counts more per decoded element but decodes the
    weight half as often wins; below the tiles' M the 128-row one does."""
    common = dict(format="Q8_0", cc=90, layout="planes")
    rows = [dict(kernel="bf16", format="BF16", cc=90, layout="blocks", block_m=128, clocks_per_element=1.0),
            dict(kernel="qmm", block_m=128, clocks_per_element=40.0, **common),
            dict(kernel="qmm", block_m=256, clocks_per_element=60.0, **common),
            dict(kernel="qmv", block_m=16, clocks_per_element=1.0, **common),
            dict(kernel="gemv", block_m=0, clocks_per_element=1.0, **common),
            dict(kernel="dequant", block_m=0, clocks_per_element=1.0, **common)]
    gpu = sass.GPUS["H100 SXM"]
    weight_bytes = get_format("Q8_0").row_bytes(sass.FLUX_K) * sass.FLUX_N
    estimates = {(name, M): fused for name, _, M, _, fused, *_ in sass.estimate_rows(rows, [128, 4608])}
    for M, tile in ((128, 1), (4608, 2)):
        base = sass.launch_ms(rows[0], gpu, M, 2 * sass.FLUX_N * sass.FLUX_K)
        assert estimates[("H100 SXM", M)] == pytest.approx(sass.launch_ms(rows[tile], gpu, M, weight_bytes) / base)
    assert sass.launch_ms(rows[2], gpu, 4608, weight_bytes) < sass.launch_ms(rows[1], gpu, 4608, weight_bytes)


def test_compiles_and_counts_a_kernel_for_sm_90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from bench.compile_check import _compiler_process

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_compiler_process) as pool:
        row = pool.submit(sass.analyse, ("dequant", "Q8_0", 90, "planes")).result()
    assert row["loop"] > 0 and row["spills"] == 0 and row["registers"] > 0
    assert row["per_element"] == pytest.approx(sum(row["by_class"].values()))
    assert row["clocks_per_element"] >= row["per_element"] and row["bound_by"] in ("issue", *sass.PIPES)
    assert row["load_widths"]  # the decode reads the weight with global loads


@pytest.mark.parametrize("cc", [80, 90])
def test_integer_and_level_tiles_reach_the_tensor_cores_without_shared_memory(cc):
    """Q2_K's and Q3_K's integer tiles and NF4's level tiles in the split-K kernel (bf16 activations) are decoded in
    the registers the tensor cores' operand holds them in (`decode_planes.in_operand_order`): only x and Q2_K's
    sums, the B operand, and NF4's absmax go through shared memory. Decoded where Triton laid out their loads, the
    tiles went there too: 0.27-0.46 shared-memory instructions per weight element on sm_80 and sm_90, against
    0.02-0.14 now."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from bench.compile_check import _compiler_process

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_compiler_process) as pool:
        rows = [pool.submit(sass.analyse, ("qmv", fmt, cc, "planes", 1)).result() for fmt in ("Q2_K", "Q3_K", "NF4")]
    for row in rows:
        assert row["block_k"] == (128 if row["format"] == "NF4" else 256) and row["spills"] == 0
        assert row["by_class"].get("shared", 0.0) < 0.2, row


def test_dequantize_kernel_against_memory_speed():
    """A dequantize kernel whose issue time is below the memory time runs at memory speed (ratio 1)."""
    row = dict(kernel="dequant", format="Q8_0", cc=90, layout=sass.kernel_layout("Q8_0"), clocks_per_element=0.0)
    (gpu, fmt, estimate, memory, ratio), *_ = sass.dequantize_rows([row])
    assert (fmt, ratio) == ("Q8_0", pytest.approx(1.0))
    bytes_moved = (3072 * 34 // 32 + 2 * 3072) * 3072
    assert memory == pytest.approx(1e3 * bytes_moved / (sass.GPUS[gpu][4] * 1e12))


def test_static_dispatch_takes_the_cheaper_method_and_quant_linear_follows_it(tmp_path, monkeypatch):
    from kernels import dispatch

    # H100 model; a slow fused GEMV at M = 1 (issue-bound), a fast split-K one, a dequantize kernel at memory speed
    rows = [dict(kernel="bf16", format="BF16", cc=90, layout="blocks", block_m=128, clocks_per_element=1.0),
            dict(kernel="qmm", format="Q8_0", cc=90, layout="planes", block_m=128, clocks_per_element=1.0),
            dict(kernel="gemv", format="Q8_0", cc=90, layout="planes", block_m=0, clocks_per_element=500.0),
            dict(kernel="qmv", format="Q8_0", cc=90, layout="planes", block_m=16, clocks_per_element=1.0),
            dict(kernel="dequant", format="Q8_0", cc=90, layout="planes", block_m=0, clocks_per_element=0.0),
            dict(kernel="qmv", format="Q8_0", cc=90, layout="blocks", block_m=16, clocks_per_element=0.0)]  # not run
    # the same kernels on sm_89 (the RTX 4090 comes first in GPUS there): the fused GEMV is fast
    rows += [dict(r, cc=89, clocks_per_element=1.0 if r["kernel"] == "gemv" else r["clocks_per_element"]) for r in rows]
    chosen = sass.static_methods(rows)
    assert sorted(chosen) == [89, 90] and chosen[90][0] == "H100 SXM" and chosen[89][0] == "RTX 4090"
    methods = chosen[90][1]
    assert methods["Q8_0@1"] == "dequant_matmul" and methods["Q8_0@16"] == "fused"
    assert chosen[89][1]["Q8_0@1"] == "fused"
    monkeypatch.setattr(dispatch, "SHIPPED_DIR", tmp_path)
    for cc, (_, table) in chosen.items():
        assert dispatch.write_static_table(table, "test", cc) == tmp_path / f"static-model-sm{cc}.json"
    try:
        assert dispatch.default_method("Q8_0", 1, 90) == "dequant_matmul"
        assert dispatch.default_method("Q8_0", 1, 89) == "fused"
        assert dispatch.default_method("Q4_0", 1, 90) == "fused"  # not in the table: the rule
        assert dispatch.default_method("Q8_0", 4608, 100) == "dequant_matmul"  # no table for sm_100: the rule
        assert dispatch.method("Q8_0", 1, "Unmeasured GPU", 90) == "dequant_matmul"
    finally:
        dispatch.static_table.cache_clear()
