"""Results in, DICOM objects out: UIDs, codes, the SR document and its template, key images, and
the batch that writes them."""

from cxrsr.sr.highdicom_memo import memoise_pixel_data_check

memoise_pixel_data_check()  # before anything builds an SR (see the module's docstring)
