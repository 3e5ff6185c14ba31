"""Generated iCEFARM API stubs."""
