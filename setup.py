"""Only the optional C accelerators live here; everything else is in pyproject.toml.

``optional=True``: without a compiler or OpenSSL's headers (``libssl-dev``) an extension is
skipped with a warning and the package runs its pure-Python path (same results, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "rapidmq_edge.crypto._fastpath",
            ["rapidmq_edge/crypto/_fastpath.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall"],
            optional=True,
        ),
        # the per-stream anomaly detector's update: exact IEEE double arithmetic, as
        # Python's (no FMA contraction, no fast-math)
        Extension(
            "rapidmq_edge.intelligence._detectorstep",
            ["rapidmq_edge/intelligence/_detectorstep.c"],
            libraries=["m"],
            extra_compile_args=["-O2", "-Wall", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        ),
        # the anomaly classifier's residual rows and combination; the same arithmetic rules
        Extension(
            "rapidmq_edge.intelligence._residualstep",
            ["rapidmq_edge/intelligence/_residualstep.c"],
            libraries=["m"],
            extra_compile_args=["-O2", "-Wall", "-ffp-contract=off", "-fno-fast-math"],
            optional=True,
        ),
        # MQTT framing and the PUBLISH / PUBACK fast lane of PacketReader (Python API only)
        Extension(
            "rapidmq_edge.mqtt._framing",
            ["rapidmq_edge/mqtt/_framing.c"],
            extra_compile_args=["-O2", "-Wall"],
            optional=True,
        ),
    ]
)
