"""Domain-adaptation methods behind one contract, the safety gate, the tile buffer and the adaptation job."""
