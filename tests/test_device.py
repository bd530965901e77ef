"""The precision a run trains in: bfloat16 where the CPU multiplies it natively, float32 elsewhere."""
import keras

from runners.device import configure_devices, cpu_has_bf16


def test_only_cpus_with_bfloat16_instructions_are_taken_for_bfloat16_machines():
    assert cpu_has_bf16("flags\t\t: fpu sse avx2 avx512f avx512bw avx512_bf16 avx512_vnni")  # Zen 4/5, Cooper Lake
    assert cpu_has_bf16("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile")                    # Sapphire Rapids
    assert not cpu_has_bf16("flags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_vnni")      # AVX-512 without bf16
    assert not cpu_has_bf16("")


def test_mixed_precision_on_a_cpu_is_bfloat16_and_off_is_float32_whatever_ran_before():
    assert configure_devices(True)["mixed_precision"] == "bfloat16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert configure_devices(False)["mixed_precision"] is False
    assert keras.mixed_precision.global_policy().name == "float32"
    automatic = configure_devices(None)["mixed_precision"]
    assert automatic == ("bfloat16" if cpu_has_bf16() else False)
