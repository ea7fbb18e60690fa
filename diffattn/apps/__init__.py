"""Applications built on diffattn: the Gradio demo (:mod:`diffattn.apps.demo`)."""
