"""SecAgg+ (Bell et al., CCS 2020): the server learns only the weighted sum of the sites'
updates. Pure protocol core (no Flower): neighbour graph, signed key advertisements,
ChaCha20 mask expansion, Shamir shares over AES-GCM, fixed-point arithmetic mod 2^64."""
