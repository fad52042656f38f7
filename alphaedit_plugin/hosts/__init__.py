"""The hosts the plugin plugs into: EasyEdit (:mod:`.easyedit`)."""
