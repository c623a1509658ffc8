"""Results in, DICOM objects out: the checked entries, the source header, the TID 1500 content and
its fast builder, the file, UIDs, codes, key images, and the batch that writes them."""

from cxrsr.sr.highdicom_memo import memoise_pixel_data_check

memoise_pixel_data_check()  # before anything builds an SR (see the module's docstring)
