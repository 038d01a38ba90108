"""fnn-ray: the FNN foundation model of mouse visual cortex (MICrONS digital twin), run at scale on Ray."""
