"""Stubs generated from proto/proto/embark/v1/embark.proto by
clients/python/gen_stubs.sh (do not edit them; rerun the script). Private:
the public API returns the types of embark_client.results instead."""
