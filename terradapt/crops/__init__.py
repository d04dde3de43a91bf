"""Crop mapping from satellite image time series.

Parcel series, their STAC record, the BreizhCrops-layout reader, a seeded generator of countries, and the PSE + L-TAE
parcel classifier with its checkpoint format.

Nothing here imports the segmentation pipeline's runners; the adapters of this task are in ``adapters.crops``.
"""
