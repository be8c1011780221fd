"""The shared test rig: real registries in every flavour, fixture images, fault proxy."""
