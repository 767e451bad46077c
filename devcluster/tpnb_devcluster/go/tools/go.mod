// Small static helper binaries for the dev cluster's images (stdlib only, so
// building them needs nothing from the module proxy).
module tpnb.local/devcluster/tools

go 1.23.0
