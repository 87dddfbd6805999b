"""Running the pack outside a ComfyUI server: locating and booting the host, the headless workflow runner,
the embedded tiny models and the demo. Nothing here is imported when ComfyUI itself loads the pack."""
