"""Only the optional C accelerator lives here; everything else is in pyproject.toml.

``optional=True``: without a compiler or OpenSSL's headers (``libssl-dev``) the extension is
skipped with a warning and the package runs its pure-Python path (same bytes, slower).
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
        )
    ]
)
