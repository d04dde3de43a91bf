"""The crop-mapping loop: parcel series -> prediction -> drift -> trigger -> adaptation -> gate -> registry.

``config`` (the ``[crops]`` settings section), ``pipeline`` (the stages, once), ``runner`` (the in-process
runner moving parcels and per-region state), ``demo`` (``terradapt demo --task crops``). No Kafka path yet.
"""
