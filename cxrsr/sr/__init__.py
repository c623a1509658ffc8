"""Results in, DICOM objects out: UIDs, codes, the SR document and its template, key images, and
the batch that writes them."""
