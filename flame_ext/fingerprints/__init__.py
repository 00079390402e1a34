"""Tensor fingerprints, in one place: the sums (``algorithm``), what a mismatch means (``forensics``), the
typed record a manifest keeps (``record``) and the one comparison rule every check uses (``compare``)."""
