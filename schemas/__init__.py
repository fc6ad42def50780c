"""Job specs (pydantic) and output schemas (Arrow) shared by the driver and the workers."""
