"""Adaptation methods for the crop parcel classifier, behind their own small contract and registry.

The model is ``terradapt.crops.model.CropModel``; the registry is ``adapters.crops.registry``.

Why not the segmentation ``adapters.base.Adapter``: its methods take image tensors (N, C, H, W) and a
``SegmentationModel`` (BatchNorm2d statistics, flips, per-pixel losses), while a crop model takes a ``CropBatch``
(reflectance, days of year, date mask) and has BatchNorm1d layers and a calendar. The contract is the same shape
(configure, changed names, ``adapt_step``, ``adapt``, ``reset``, state round trip) so the registry-generated
contract tests are the same shape too (tests/adapters/test_crop_adapter_contracts.py).
"""
