"""How the pure model runs on hardware: mixed precision, compilation (placement plans come here too)."""
