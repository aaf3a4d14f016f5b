"""Talks to a test X server (TigerVNC's Xvnc) with python-xlib, a client nobody here wrote.

  x11.py paint DISPLAY RRGGBB   fill the root window with one colour, then exit
  x11.py pointer DISPLAY        print the pointer's root position as "x y"
"""
import sys

from Xlib import X, display as xdisplay


def main():
    command, name = sys.argv[1], sys.argv[2]
    d = xdisplay.Display(name)
    screen = d.screen()
    root = screen.root
    if command == "paint":
        rgb = sys.argv[3]
        colour = screen.default_colormap.alloc_color(
            int(rgb[0:2], 16) * 257, int(rgb[2:4], 16) * 257, int(rgb[4:6], 16) * 257)
        root.change_attributes(background_pixel=colour.pixel)
        root.clear_area(0, 0, 0, 0)
        d.sync()
    elif command == "pointer":
        p = root.query_pointer()
        print(p.root_x, p.root_y)
    else:
        sys.exit(f"unknown command {command}")


main()
