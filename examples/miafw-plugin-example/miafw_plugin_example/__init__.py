"""miafw-plugin-example: third-party plugins for miafw, registered through entry points.

* attack ``demo-mentr`` (:class:`miafw_plugin_example.mentr.Mentr`): the modified prediction entropy
  of Song & Mittal (USENIX Security 2021);
* defense ``temperature`` (:class:`miafw_plugin_example.temperature.Temperature`): post-training
  temperature scaling of the output layer.

The plugin modules are not imported here: ``miafw list`` and ``miafw eval`` import only the one
module an entry point names, so importing this package stays free of torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
