/**
 * What opening and creating images by path takes from `qcow/node`, in a module of its own: the
 * CLI and the QEMU personas import it only when they open or create an image, so that `--help`,
 * `--version` and argument errors do not set up every format first. (A dynamic import of the
 * entry point itself would bring every export of the package into each command's bundle: see
 * scripts/build-cli.mjs.)
 */
export { builtinFormats, createImage, defaultOpener, openImage } from '../node.js';
