"""eagle-dr: cross-region disaster recovery for the Eagle Alert System on Temporal."""
