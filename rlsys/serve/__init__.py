"""Serving: ``python -m rlsys.serve`` and Ray Serve's ``rlsys.serve:app_builder`` (:mod:`.app`),
request checks, the HTTP client (:mod:`.client`) and the detect CLI (:mod:`.detect`)."""


def __getattr__(name: str):
    # Ray Serve imports "rlsys.serve:app_builder"; the app (Ray Serve, vLLM) loads only then, so
    # the client and the detect CLI stay light.
    if name == "app_builder":
        from rlsys.serve.app import app_builder

        return app_builder
    raise AttributeError(name)
