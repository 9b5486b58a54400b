"""The detector as pure jitted functions of (params, batch): loss, proposals, predictions."""
