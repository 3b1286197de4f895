"""his: the patient registry (encrypted identifiers, blind-index lookup) and HIS integration."""
