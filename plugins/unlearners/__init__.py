"""Built-in unlearning methods (entry-point group ``miafw.unlearners``)."""
