#ifndef GUARD_CMOUNT_SHIM_H
#define GUARD_CMOUNT_SHIM_H
#include <libmount/libmount.h>
#include <blkid/blkid.h>
#endif
