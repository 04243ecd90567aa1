"""The built-in plugins: each file one plugin, each using only public hooks.

They are registered by every Trainer in this order (see
:data:`dltrain.BUILTIN_PLUGINS`) unless named in ``disable_plugins`` or
turned off by the config.
"""
