"""A vLLM emulator: the OpenAI API and /metrics of vLLM, with calibrated continuous batching.

Used for capacity planning without GPUs and as the engine of the benchmark, where it runs
in-process on a virtual-time loop (`InProcessTransport`).
"""

from serving.emulator.profiles import PROFILES, Profile, saturated_time_s, solo_latency_s

__all__ = ["PROFILES", "Profile", "saturated_time_s", "solo_latency_s"]
