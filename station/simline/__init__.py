"""The simulated line: belt world, camera and firmware simulator wired as a real line would be."""
